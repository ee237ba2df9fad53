"""``python -m covid_tune SPEC ...`` is ``python -m covid_tune.run SPEC ...`` (also ``--version``, ``--help``)."""

import sys

from covid_tune.run import main

sys.exit(main())
