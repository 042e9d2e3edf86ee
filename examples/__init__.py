"""Example models built outside ``src/mbrec`` (see docs/adding-a-model.md).

A regular package, so that ``import examples.bprmf`` from the repository root cannot be shadowed
by another installed ``examples`` package."""
