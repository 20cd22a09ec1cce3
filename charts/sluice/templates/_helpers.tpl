{{/*
Names and labels shared by the chart's templates.
*/}}

{{/*
The release's base name: the release name when it already says "sluice"
(`helm install sluice ...` gives "sluice"), otherwise "<release>-sluice".
Truncated so that "<fullname>-operator-leader-election" stays a valid name.
*/}}
{{- define "sluice.fullname" -}}
{{- if contains "sluice" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-sluice" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{/*
The name of the operator's Deployment, Service, ServiceMonitor, ClusterRole
or Role, and of its leader-election Lease.
*/}}
{{- define "sluice.operator.name" -}}
{{- printf "%s-operator" (include "sluice.fullname" .) -}}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "sluice.operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "sluice.operator.name" .) -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end }}

{{/*
The Lease the operator replicas elect their leader on (in the release's
namespace).
*/}}
{{- define "sluice.operator.leaseName" -}}
{{- include "sluice.operator.name" . -}}
{{- end }}

{{/*
The namespace whose StreamingQueries the operator reconciles; empty for all.
*/}}
{{- define "sluice.watchNamespace" -}}
{{- .Values.watchNamespace | default "" -}}
{{- end }}

{{/*
The operator's image: image.repository, and image.tag or else the chart's
appVersion.
*/}}
{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{/*
The engine image of queries that do not set spec.engine.image: engineImage,
or else the operator's own image (it holds both binaries).
*/}}
{{- define "sluice.engineImage" -}}
{{- .Values.engineImage | default (include "sluice.image" .) -}}
{{- end }}

{{/*
The labels of every object of the operator.
*/}}
{{- define "sluice.operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sluice.operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: sluice
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The labels that select the operator's pods.
*/}}
{{- define "sluice.operator.selectorLabels" -}}
app.kubernetes.io/name: sluice-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The labels the operator puts on every engine pod (operator/src/objects.rs,
labels()); the PodMonitor selects engine pods by them.
*/}}
{{- define "sluice.engine.selectorLabels" -}}
app.kubernetes.io/name: sluice-engine
app.kubernetes.io/managed-by: sluice-operator
{{- end }}
