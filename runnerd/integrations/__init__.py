"""Glue for agent frameworks (optional extras: runnerd[smolagents], runnerd[langchain])."""
