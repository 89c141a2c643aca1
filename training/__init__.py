"""Training, evaluation and data preparation for M2Rec (see DESIGN.md §4–§5)."""
