"""The test harness itself: the server fixtures, the task-leak check, the benchmark smoke run."""
