"""Simulation studies of spfa: sanity checks, peer benchmark, scale, likelihoods, figures."""
