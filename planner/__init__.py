"""The Expert Selection Agent (parse, retrieve, review), subgraph activation, and the VGAE that predicts
each selected expert's merge coefficient as a Beta distribution."""
