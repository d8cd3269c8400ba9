"""Running the scientist's actions, inside a worker process: the executor, its size
pre-checks, in-place rules and the plan runner. Imported by the worker only (lazily), never
by the scientist's side."""
