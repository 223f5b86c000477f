"""The drivers: where the tasks of a call run. One module each, imported only when chosen."""
