"""Training: the activation schedule (``StochActSchedule``), gate shifts, and the relufication recipe's pieces."""
