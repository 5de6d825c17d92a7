"""The suite's own subcommands (beside LightningCLI's fit/validate/test/predict)."""
