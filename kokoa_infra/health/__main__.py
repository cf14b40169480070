"""`python -m kokoa_infra.health ...` is `kokoa health ...` (the benchmark and the namespace tests run it so)."""

from kokoa_infra.health.command import health

health(prog_name="kokoa health")
