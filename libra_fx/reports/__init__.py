"""Reports: the graph diff, the canonical stage printout, the FLOPs report, kept-token maps and plots."""
