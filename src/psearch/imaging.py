"""Images and boxes shared by data and models: normalisation constants, crops, box ops."""
