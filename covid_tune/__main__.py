"""``python -m covid_tune SPEC ...`` is ``covid-tune run SPEC ...`` (also ``--version``, ``--help``)."""

import sys

from covid_tune.cli.run import main

sys.exit(main())
