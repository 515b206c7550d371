"""The application around the library: from an experiment to a Ray Tune search (`search`), where
a run lives (`location`, `rundir`), what it leaves (`results`, `export`) and what it prints
(`progress`). The commands (`tuning.run`, `tuning.predict`, `tuning.report`) are thin layers on it."""
