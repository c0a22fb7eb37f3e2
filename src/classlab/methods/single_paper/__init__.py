"""Single-paper protocols: each method brings its own protocol (its YAML's scenario_kinds names it)."""
