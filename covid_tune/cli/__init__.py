"""The ``covid-tune`` command: ``run``, ``report``, ``predict``; pre-flight, output folder, live console."""
