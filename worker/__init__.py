"""leadstage-sync's worker and the definitions producers share with it."""
