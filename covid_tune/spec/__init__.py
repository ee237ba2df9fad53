"""The sweep spec (YAML + ``--set`` -> a validated, frozen ``Spec``) and its plan (one ``HParams`` per trial)."""
