#!/bin/sh
# Prints what a task gives its scripts.
echo "The following arguments were passed to this task:"
echo
for arg in "$@"; do
    printf '  %s\n' "$arg"
done
echo
echo "task id: $TASKTRAIN_TASK_ID, working directory: $(pwd)"
exit 0
