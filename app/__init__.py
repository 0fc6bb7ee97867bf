"""The application layer: the `streamtune` command line and the demo. It may import the Prefect flows; the
library (`streamtune/`) never does."""
