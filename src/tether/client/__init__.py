"""The app side: the drop-in socket class, lookups, install()."""
