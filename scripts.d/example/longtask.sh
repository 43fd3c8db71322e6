#!/bin/sh
# Stands for a slow deploy: new tasks are still accepted and queued meanwhile.
echo "Some important and long-lasting task could be happening now."
echo "Note how new tasks are still accepted and queued while this is running..."
sleep 10
echo "Done."
exit 0
