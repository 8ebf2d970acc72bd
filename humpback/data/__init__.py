"""Data builders: seed pairs and an unlabelled corpus from local documentation, and the paper's oasst1 seed."""
