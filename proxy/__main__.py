"""`python -m proxy`: same as the `media-sidecar` console script."""

from proxy.cli import main

raise SystemExit(main())
