"""What every test shares."""

import os

# After each command DVC starts a background process that posts usage analytics, and leaves its
# report in the temporary folder when the post fails (this machine has no network). The suite
# runs a few hundred dvc commands; none of them should phone home.
os.environ["DVC_NO_ANALYTICS"] = "1"
