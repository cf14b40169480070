"""The local Cloudflare stand-in, now at kokoa_infra/lab/cloudflare_standin.py (the lab runs it too).

Kept so that tests and `python tests/fake_cloudflare.py --port P --token T --zone Z` work as before.
"""

from kokoa_infra.lab.cloudflare_standin import *  # noqa: F401,F403
from kokoa_infra.lab.cloudflare_standin import FakeCloudflare, failure_envelope, main  # noqa: F401

if __name__ == "__main__":
    main()
