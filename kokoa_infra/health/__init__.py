"""`kokoa health`: which nodes to check (targets), how (probes), what was found (results), and
what is made of it (report, html); `command` is the CLI, `netns` builds test networks.

Nothing here imports Pulumi: a monitoring host runs `kokoa health` on the stack outputs alone.
"""
