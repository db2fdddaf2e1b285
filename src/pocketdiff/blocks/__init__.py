"""UNet blocks skipped at random (robust training) or removed for good (a searched architecture): below the folder
loader, which applies a saved config's removals."""
