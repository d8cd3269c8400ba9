"""The data owner's half of the seed flow, as typed in a notebook or script."""

import sys

import torch

import duet_p2p as sy

signaling_url = sys.argv[1] if len(sys.argv) > 1 else None
duet = sy.launch_duet(signaling_url=signaling_url)  # reads the Client ID at the prompt

data = torch.tensor([[0, 0], [0, 1]]).tag("data")
target = torch.tensor([[0], [0]]).tag("target")
data_ptr = data.send(duet, searchable=True)
target_ptr = target.send(duet, searchable=True)

request = duet.requests.wait(timeout=60)  # a script waits; a notebook just looks
if request is None:
    sys.exit("no request arrived within 60 s")
print(duet.requests)
print(duet.requests[0])
duet.requests[0].accept()

duet.wait_closed(timeout=60)  # until the scientist is done
print(duet.audit)
