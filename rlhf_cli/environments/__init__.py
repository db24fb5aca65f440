"""Multi-turn text environments: tools a model calls mid-response, protocols, episode bookkeeping."""
