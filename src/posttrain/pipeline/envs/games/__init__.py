"""Multi-turn games: `env=game:guess_number` (the cookbook's game) and `env=game:tic_tac_toe` (textarena's,
against a fixed, seeded opponent). One module each; the registry names them."""
