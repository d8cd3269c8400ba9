"""Messages, their wire codec, and the endpoint that sends and dispatches them."""
