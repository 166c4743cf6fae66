"""A stand-in for the mini world's interface (``world.prompts``, ``world.scorers``, ``world.paths``), used only
to test that ``diffgraph eval`` routes ``world:`` sets and world metrics through it."""
