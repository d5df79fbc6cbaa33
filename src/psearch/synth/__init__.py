"""The synthetic CUHK-SYSU-layout dataset generator (`psearch synth`)."""
