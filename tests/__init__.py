"""The test suite (a package, so that its helper modules, e.g. ``tests.faults``, import as ``tests.x``)."""
