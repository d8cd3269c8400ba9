"""The data scientist's half of the seed flow."""

import sys
import time

import duet_p2p as sy

duet_id, signaling_url = sys.argv[1], sys.argv[2]
duet = sy.join_duet(duet_id, signaling_url=signaling_url)

for _ in range(100):  # a person would look when the owner says the data is there
    if len(duet.store) >= 2:
        break
    time.sleep(0.1)
print(duet.store)
data_ptr = duet.store[0]  # also duet.store["data"]
target_ptr = duet.store[1]

sum_ptr = data_ptr.sum().item()
value = sum_ptr.get(reason="To see the result", request_block=True, timeout_secs=60)
print(value)
duet.close()
