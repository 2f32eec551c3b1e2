//! The TaskManager: slots and the tasks running in them
