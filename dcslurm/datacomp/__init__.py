"""DataComp's own facts: the eval task list, pool metadata and uids, the leaderboard."""
