"""Multi-turn tool use: one environment (`agent`) over tool sets, one module each (`calculator`, `search`)."""
