"""The whole system on one machine: network-namespace hosts driven by the program's own commands."""

# `kokoa lab up` prints the seed of its command order; set this to replay it (lab/executor.py).
ORDER_SEED_ENV = "KOKOA_LAB_ORDER_SEED"
