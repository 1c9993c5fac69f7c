"""Development tools shipped with the package: the Replicate simulator and the demo launcher."""
