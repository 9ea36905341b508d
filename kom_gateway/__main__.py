"""`python -m kom_gateway` is the `kom-gateway` command."""

import sys

from kom_gateway.cli import main

sys.exit(main())
