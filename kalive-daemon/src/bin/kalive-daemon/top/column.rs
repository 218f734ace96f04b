//! The table's columns and the order of its rows.

/// The table's columns, in display order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Column {
    Local,
    Remote,
    Keepalive,
    Idle,
    Probes,
    Sent,
    Answered,
    LastProbe,
    State,
    Owner,
}

impl Column {
    pub(crate) const ALL: [Column; 10] = [
        Column::Local,
        Column::Remote,
        Column::Keepalive,
        Column::Idle,
        Column::Probes,
        Column::Sent,
        Column::Answered,
        Column::LastProbe,
        Column::State,
        Column::Owner,
    ];

    pub(crate) fn title(self) -> &'static str {
        match self {
            Column::Local => "LOCAL",
            Column::Remote => "REMOTE",
            Column::Keepalive => "IDLE/INTVL/CNT",
            Column::Idle => "IDLE",
            Column::Probes => "PROBES",
            Column::Sent => "SENT",
            Column::Answered => "ANSW",
            Column::LastProbe => "LAST PROBE",
            Column::State => "STATE",
            Column::Owner => "OWNER",
        }
    }

    /// Its position in `ALL`.
    pub(crate) fn index(self) -> usize {
        Column::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    /// The column `steps` places further, wrapping around.
    pub(crate) fn shifted(self, steps: isize) -> Column {
        let len = Column::ALL.len() as isize;
        let index = (self.index() as isize + steps).rem_euclid(len);
        Column::ALL[index as usize]
    }
}

/// How rows are ordered. The default puts the connections in trouble first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sort {
    pub(crate) column: Column,
    pub(crate) descending: bool,
}

impl Default for Sort {
    fn default() -> Self {
        Sort {
            column: Column::State,
            descending: false,
        }
    }
}
