"""Family protocols: the scenario runner and learner interface each family owns."""
