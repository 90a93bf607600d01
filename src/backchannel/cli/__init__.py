"""The ``backchannel`` command line: thin wrappers over the server, SDKs and admin API."""
