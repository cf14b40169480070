"""The whole system on one machine: network-namespace hosts driven by the program's own commands."""
