"""Pretraining methods: each makes one backbone checkpoint that downstream methods share."""
