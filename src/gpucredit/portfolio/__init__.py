"""The domain: the book, the assumptions, the engine, risk measures, contributions,
sensitivities and stress scenarios."""
