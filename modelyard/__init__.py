"""modelyard: serve thousands of ML models from a fleet of shared inference containers."""
