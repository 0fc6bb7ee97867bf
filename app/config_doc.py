"""Print docs/configuration.md: every setting of the pipeline and the library, from their definitions."""

import sys

from flows.params import PipelineParams
from streamtune.config import configuration_doc


def render() -> str:
    return configuration_doc(("pipeline", PipelineParams))


if __name__ == "__main__":
    sys.stdout.write(render())
