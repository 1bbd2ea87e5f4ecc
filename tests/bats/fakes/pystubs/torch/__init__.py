"""Stand-in for torch in the bats sandbox (see tests/bats/fakes/python): the runner's version probe and
handoff's env.txt read only these attributes, and importing the real torch costs seconds per call."""

__version__ = "2.99.0+bats.stub"


class version:  # noqa: N801 (mirrors torch.version)
    cuda = None
