"""``python -m covid_tune COMMAND ...`` is ``covid-tune COMMAND ...``."""

import sys

from covid_tune.cli.main import main

sys.exit(main())
