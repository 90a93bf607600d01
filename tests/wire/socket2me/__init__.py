"""Socket2me: the request event payload and the respond acknowledgement."""
